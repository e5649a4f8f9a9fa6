// The source account exists already and may live in another resource group or subscription: this
// module is deployed at its resource group and only adds a role assignment. It never changes the
// account itself.

param accountName string

@description('The function app\'s user-assigned identity.')
param principalId string

@description('ADLS Gen2 source whose restores must give paths their owner back: Storage Blob Data Owner (a superuser for ACL purposes). Without it a restore sets ACLs on the paths it creates but reports every owner/group change as failed (README "ADLS Gen2 fidelity").')
param restoreOwners bool = false

var roles = loadJsonContent('../roles.json')

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: accountName
}

// Storage Blob Data Contributor: the producer takes snapshots (Snapshot Blob, If-Match), writes
// their pending markers (metadata) and removes a snapshot whose request could not be queued;
// copies read the snapshots through a user-delegation SAS (Get User Delegation Key is in this
// role); an in-place restore writes, overwrites (after a snapshot) and deletes blobs; lease mode
// leases the live blob. No narrower built-in role allows snapshots and deletes together.
resource contributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(account.id, principalId, roles.storageBlobDataContributor)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

// Storage Blob Data Owner (only with restoreOwners): Path Update setAccessControl with x-ms-owner
// / x-ms-group needs a superuser; setting the ACL of a path someone else owns needs one too.
resource owner 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (restoreOwners) {
  name: guid(account.id, principalId, roles.storageBlobDataOwner)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataOwner)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

output blobEndpoint string = account.properties.primaryEndpoints.blob
// ADLS Gen2 lists names in hierarchical order: the backup account mirrors it and
// LAKEGUARD_NAME_ORDER follows it.
output isHnsEnabled bool = account.properties.?isHnsEnabled ?? false
