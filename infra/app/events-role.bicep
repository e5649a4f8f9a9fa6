// The system topic's identity may put messages on the jobs account's queues, nothing more
// (Storage Queue Data Message Sender: add messages only).

param accountName string
param topicPrincipalId string

var roles = loadJsonContent('../roles.json')

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: accountName
}

resource sender 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(account.id, topicPrincipalId, roles.storageQueueDataMessageSender)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataMessageSender)
    principalId: topicPrincipalId
    principalType: 'ServicePrincipal'
  }
}
