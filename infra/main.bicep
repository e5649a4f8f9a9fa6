// lakeguard on Azure Functions Flex Consumption: `azd up` (or `az deployment sub create`).
//
// Creates the app's resource group (identity, plan, function app, jobs storage, monitoring,
// optional Data Factory) and, by default, a separate resource group for the backup account with a
// CanNotDelete lock, so that `azd down` cannot take the backups with it. The source account is
// existing and only receives a role assignment. README: "Deploy" explains every parameter and role.

targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('azd environment name: names the resource groups and seeds a unique token for the resources.')
param environmentName string

@minLength(1)
@description('Region of every resource (one that offers Flex Consumption).')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@minLength(1)
@description('Resource id of the EXISTING storage account to protect (/subscriptions/…/resourceGroups/…/providers/Microsoft.Storage/storageAccounts/NAME). It may be in another resource group or subscription of the same tenant.')
param sourceStorageAccountId string

@description('true: the jobs account is also the backup account (fewer resources, but the host\'s Blob Data Owner role then gives the function delete rights on the backups). Default false: a separate backup account the function cannot delete from.')
param backupSharedWithJobs bool = false

@description('CanNotDelete lock on the backup account: `azd down` then cannot delete it (or its resource group) until the lock is removed.')
param lockBackupAccount bool = true

@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_RAGRS'
  'Standard_GZRS'
  'Standard_RAGZRS'
])
@description('Replication of the backup account.')
param backupStorageSku string = 'Standard_GRS'

@minValue(2)
@maxValue(365)
@description('Days after which lakeguard\'s bookkeeping records (lakeguard-state/requests/, lakeguard-state/producer-runs/) expire. Must exceed LAKEGUARD_PENDING_TTL_SECS (default 6 h). Backups are never expired.')
param bookkeepingRetentionDays int = 7

@description('ADLS Gen2 source: give the function Storage Blob Data Owner on it so that restores set owners and groups back (README "ADLS Gen2 fidelity"). Off: ACLs are restored, owner changes reported as failed.')
param sourceRestoreOwners bool = false

@description('Deploy a Data Factory with lakeguard\'s pipeline and use the datafactory copy engine.')
param deployDataFactory bool = false

@description('Principal (user, group or managed identity object id) that gets Storage Blob Data Contributor on the backup account for operator CLI work that deletes there (restore drills, prune). Empty: none.')
param operatorPrincipalId string = ''

@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param operatorPrincipalType string = 'User'

@minValue(1)
@maxValue(1000)
@description('Flex Consumption: most instances the app scales out to (each runs up to batchSize + newBatchThreshold queue messages at once, host.json).')
param maximumInstanceCount int = 100

@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@minValue(1)
@maxValue(256)
@description('LAKEGUARD_CONCURRENCY: parallel storage operations per invocation.')
param concurrency int = 16

@description('LAKEGUARD_RECONCILE_SCHEDULE: NCRONTAB of the Reconcile timer (six fields).')
param reconcileSchedule string = '0 0 * * * *'

@description('LAKEGUARD_PRUNE_SCHEDULE: NCRONTAB of the Prune timer. The timer is disabled here (AzureWebJobs.Prune.Disabled): the function identity has no delete right on the backup account, so pruning runs from an operator\'s CLI (`lakeguard prune`).')
param pruneSchedule string = '0 30 3 * * *'

@minLength(3)
@maxLength(56)
@description('LAKEGUARD_BACKUP_QUEUE (its poison queue is <name>-poison).')
param backupQueueName string = 'lakeguard-backup'

@minLength(3)
@maxLength(56)
@description('LAKEGUARD_RECONCILE_QUEUE: reconcile and producer continuations.')
param reconcileQueueName string = 'lakeguard-backup-reconcile'

@minLength(3)
@maxLength(56)
@description('LAKEGUARD_EVENT_QUEUE: the queue the Event Grid subscription fills (EventBackup).')
param eventQueueName string = 'lakeguard-backup-events'

@description('Create the Event Grid system topic of the source account and the subscription that feeds EventBackup (minutes-level RPO).')
param deployEventGrid bool = true

@description('LAKEGUARD_CONTAINERS_INCLUDE (comma list; empty: all containers).')
param containersInclude string = ''

@description('LAKEGUARD_CONTAINERS_EXCLUDE (comma list).')
param containersExclude string = ''

@description('Name of the app\'s resource group; default rg-<environmentName>.')
param resourceGroupName string = ''

@description('Name of the backup account\'s resource group; default rg-<environmentName>-backup.')
param backupResourceGroupName string = ''

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
}
var appResourceGroupName = !empty(resourceGroupName) ? resourceGroupName : 'rg-${environmentName}'
var backupRgName = backupSharedWithJobs
  ? appResourceGroupName
  : (!empty(backupResourceGroupName) ? backupResourceGroupName : 'rg-${environmentName}-backup')
var functionAppName = 'func-lakeguard-${resourceToken}'
var deploymentContainerName = 'app-package-${take(functionAppName, 32)}-${take(resourceToken, 7)}'
var jobsAccountName = 'stjobs${resourceToken}'
var backupAccountName = backupSharedWithJobs ? jobsAccountName : 'stbak${resourceToken}'

// /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Storage/storageAccounts/{name}
var sourceIdParts = split(sourceStorageAccountId, '/')
var sourceSubscriptionId = sourceIdParts[2]
var sourceResourceGroupName = sourceIdParts[4]
var sourceAccountName = last(sourceIdParts)

// The settings' container and record names (src/settings.rs STATE_CONTAINER, src/ops/state.rs,
// src/ops/snapshot/run_state.rs): the only blobs a lifecycle rule may expire.
var bookkeepingPrefixes = [
  'lakeguard-state/requests/'
  'lakeguard-state/producer-runs/'
]
var queueNames = [
  backupQueueName
  '${backupQueueName}-poison'
  reconcileQueueName
  '${reconcileQueueName}-poison'
  eventQueueName
  '${eventQueueName}-poison'
]

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: appResourceGroupName
  location: location
  tags: tags
}

resource backupRg 'Microsoft.Resources/resourceGroups@2024-03-01' = if (!backupSharedWithJobs) {
  name: backupRgName
  location: location
  tags: tags
}

module identity 'app/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: 'id-lakeguard-${resourceToken}'
    location: location
    tags: tags
  }
}

module source 'app/source-access.bicep' = {
  name: 'source-access'
  scope: resourceGroup(sourceSubscriptionId, sourceResourceGroupName)
  params: {
    accountName: sourceAccountName
    principalId: identity.outputs.principalId
    restoreOwners: sourceRestoreOwners
  }
}

module jobsStorage 'app/storage.bicep' = {
  name: 'jobs-storage'
  scope: rg
  params: {
    name: jobsAccountName
    location: location
    tags: tags
    containers: [
      deploymentContainerName
    ]
    queues: queueNames
    skuName: backupSharedWithJobs ? backupStorageSku : 'Standard_LRS'
    expiringPrefixes: backupSharedWithJobs ? bookkeepingPrefixes : []
    expireAfterDays: bookkeepingRetentionDays
    lockAccount: backupSharedWithJobs && lockBackupAccount
  }
}

module backupStorage 'app/storage.bicep' = if (!backupSharedWithJobs) {
  name: 'backup-storage'
  scope: resourceGroup(backupRgName)
  dependsOn: [
    backupRg
  ]
  params: {
    name: backupAccountName
    location: location
    tags: tags
    skuName: backupStorageSku
    isHnsEnabled: source.outputs.isHnsEnabled
    expiringPrefixes: bookkeepingPrefixes
    expireAfterDays: bookkeepingRetentionDays
    lockAccount: lockBackupAccount
  }
}

module jobsAccess 'app/jobs-access.bicep' = {
  name: 'jobs-access'
  scope: rg
  params: {
    accountName: jobsStorage.outputs.name
    principalId: identity.outputs.principalId
  }
}

module monitoring 'app/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: 'log-${resourceToken}'
    applicationInsightsName: 'appi-${resourceToken}'
    location: location
    tags: tags
    publisherPrincipalId: identity.outputs.principalId
  }
}

module dataFactory 'app/datafactory.bicep' = if (deployDataFactory) {
  name: 'datafactory'
  scope: rg
  params: {
    name: 'adf-lakeguard-${resourceToken}'
    location: location
    tags: tags
    runnerPrincipalId: identity.outputs.principalId
  }
}

module backupAccess 'app/backup-access.bicep' = {
  name: 'backup-access'
  scope: resourceGroup(backupRgName)
  dependsOn: [
    backupStorage
    jobsStorage
  ]
  params: {
    accountName: backupAccountName
    functionPrincipalId: backupSharedWithJobs ? '' : identity.outputs.principalId
    factoryPrincipalId: deployDataFactory ? dataFactory!.outputs.principalId : ''
    operatorPrincipalId: operatorPrincipalId
    operatorPrincipalType: operatorPrincipalType
  }
}

module eventsTopic 'app/events-topic.bicep' = if (deployEventGrid) {
  name: 'events-topic'
  scope: resourceGroup(sourceSubscriptionId, sourceResourceGroupName)
  params: {
    accountName: sourceAccountName
    tags: tags
  }
}

module eventsRole 'app/events-role.bicep' = if (deployEventGrid) {
  name: 'events-role'
  scope: rg
  dependsOn: [
    jobsStorage
  ]
  params: {
    accountName: jobsAccountName
    topicPrincipalId: deployEventGrid ? eventsTopic!.outputs.principalId : ''
  }
}

module eventsSubscription 'app/events-subscription.bicep' = if (deployEventGrid) {
  name: 'events-subscription'
  scope: resourceGroup(sourceSubscriptionId, sourceResourceGroupName)
  dependsOn: [
    eventsRole
  ]
  params: {
    topicName: deployEventGrid ? eventsTopic!.outputs.name : ''
    jobsAccountId: resourceId(subscription().subscriptionId, appResourceGroupName, 'Microsoft.Storage/storageAccounts', jobsAccountName)
    queueName: eventQueueName
    containers: empty(containersInclude) ? [] : split(containersInclude, ',')
  }
}

module functionApp 'app/function.bicep' = {
  name: 'function'
  scope: rg
  dependsOn: [
    jobsAccess
    backupAccess
    source
  ]
  params: {
    name: functionAppName
    planName: 'plan-${resourceToken}'
    location: location
    tags: tags
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    jobsBlobEndpoint: jobsStorage.outputs.blobEndpoint
    jobsQueueEndpoint: jobsStorage.outputs.queueEndpoint
    jobsTableEndpoint: jobsStorage.outputs.tableEndpoint
    deploymentContainerName: deploymentContainerName
    sourceBlobEndpoint: source.outputs.blobEndpoint
    backupBlobEndpoint: backupSharedWithJobs ? jobsStorage.outputs.blobEndpoint : backupStorage!.outputs.blobEndpoint
    nameOrder: source.outputs.isHnsEnabled ? 'hierarchical' : 'utf16'
    sourceHns: source.outputs.isHnsEnabled
    applicationInsightsConnectionString: monitoring.outputs.connectionString
    backupQueueName: backupQueueName
    reconcileQueueName: reconcileQueueName
    eventQueueName: eventQueueName
    reconcileSchedule: reconcileSchedule
    pruneSchedule: pruneSchedule
    concurrency: concurrency
    containersInclude: containersInclude
    containersExclude: containersExclude
    dataFactoryName: deployDataFactory ? dataFactory!.outputs.name : ''
    dataFactoryResourceGroupName: deployDataFactory ? rg.name : ''
    dataFactoryPipelineName: deployDataFactory ? dataFactory!.outputs.pipelineName : ''
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
  }
}

output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output LAKEGUARD_BACKUP_RESOURCE_GROUP string = backupRgName
output AZURE_FUNCTION_NAME string = functionApp.outputs.name
output SERVICE_LAKEGUARD_NAME string = functionApp.outputs.name
output AZURE_FUNCTION_URL string = 'https://${functionApp.outputs.defaultHostName}'
output LAKEGUARD_PRODUCER_URL string = 'https://${functionApp.outputs.defaultHostName}/api/snapshot'
output LAKEGUARD_IDENTITY_CLIENT_ID string = identity.outputs.clientId
output LAKEGUARD_IDENTITY_PRINCIPAL_ID string = identity.outputs.principalId
output LAKEGUARD_BACKUP_ACCOUNT string = backupAccountName
output LAKEGUARD_JOBS_ACCOUNT string = jobsAccountName
output LAKEGUARD_DATA_FACTORY_NAME string = deployDataFactory ? dataFactory!.outputs.name : ''
